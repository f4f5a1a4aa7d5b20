"""Pretrained families shipped with zoo (see README.md in this folder for the model cards).

``zoo.create_model(NAME, pretrained=True)`` loads ``NAME.safetensors`` from here.
"""
