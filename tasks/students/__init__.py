"""The students of data distillation (issue 4): vocabulary, BOW/CNN/BiLSTM models, distillation losses,
streaming shard batches, training with resumable checkpoints, metrics and throughput, export + serving.

Import the submodules you need (``from slimflow.tasks.students.train import train_student``): this package imports
nothing heavy itself, so ``import slimflow.tasks.students`` stays cheap (torch loads with models/train/export).
"""
