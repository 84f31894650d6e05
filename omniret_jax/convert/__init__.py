"""Every weight loader and writer: key maps per checkpoint layout, safetensors streaming, PEFT, orbax."""
