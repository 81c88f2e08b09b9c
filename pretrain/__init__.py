"""pretrain: distributed pretraining on Ray + DeepSpeed ZeRO + Triton + webdataset + W&B."""
