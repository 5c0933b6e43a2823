"""The pipeline's shared facts, torch-free so the operator image can import them alone: the stage
table (stages.py)."""
