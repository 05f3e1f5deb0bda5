"""Small demo datasets written for jaxalign (CC0-1.0); see README.md here and `generate.py`."""
