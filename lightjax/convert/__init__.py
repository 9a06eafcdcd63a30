"""Weight and folder formats of other tools: Hugging Face folders (hf.py, hf_config.py, hf_weights.py,
hf_folder.py), PEFT adapters (peft.py), safetensors (safetensors_io.py), and lightjax's own export (export.py)."""
