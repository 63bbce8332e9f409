"""Export: generators to checked ONNX models, the model card, reference-checkpoint import."""
