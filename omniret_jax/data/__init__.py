"""Host side: manifest, decoding, features, augmentations, token layouts and batches (NumPy, grain); never imports model/."""
