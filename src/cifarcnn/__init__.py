"""cifarcnn: a DVC + MLflow pipeline that re-creates a CNN-on-CIFAR-10 report.

Modules, in pipeline order: config (params.yaml -> validated run configs), fetch/data/assets
(the download stage), convmath (Task 1), models (registry), batches/augment (in-memory
batches), training (the one loop) + step (eager or CUDA-graph step), tracking (MLflow),
pipeline (train + track), evaluation, visualize (Task 4b/4c), figures, report; fsutil (atomic,
staged writes) and codedeps (what each stage imports) serve them all; warm runs each stage
script in a fork of a process that has torch and mlflow imported (the stages' launcher).
"""
