"""The numeric core: the quantization spec, the quantizer (reference and fused), the penalty, packing, weight
selection, FSDP2 shards, PTQ and QAT. Tensors and modules only: no Trainer, Hub or datasets imports."""
