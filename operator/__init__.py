"""nanorun.operator: the LLMRun API (pydantic), the stage plan, the kopf operator that turns an
LLMRun into PyTorchJobs and a RayService, and the local executor behind `nanorun run`.

Never imports torch: the operator image stays small.
"""
