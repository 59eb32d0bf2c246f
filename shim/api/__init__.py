"""Protobuf messages generated from protos/. Do not edit: regenerate with `python tools/genproto.py`."""
