"""Finetuning classifiers, one module per encoder family: the timm model (or the project encoder plus a head),
its layer-id map for layer-wise lr decay and its no-decay rules. A method picks one in
``conf/finetune/<method>.yaml`` (``finetune.classifier._target_``)."""
