"""Stage 3, the models: tokenizer and base loaded with ``from_pretrained`` (quantized if asked), their
forms (adapters, quantization), and the LM head whose input the fused loss and the teacher read."""
