"""Exporters (ONNX) and their torch-free runtimes; see the ONNX issue."""
