"""nanorun.operator: the kopf operator that turns an LLMRun into one Kubeflow job per stage (a
PyTorchJob or a Trainer v2 TrainJob, queued through Kueue when asked) and a KubeRay RayService, and
an LLMSweep into its points' LLMRuns. `api/` is the LLMRun API (pydantic, from which the CRD is
generated), `children/` the objects the operator creates, `reconcile/` the stage plan and the pure
decisions, `loop/` the live process (kopf handlers, reconcile loop, work queue), `sweep/` LLMSweep.
`nanorun run` (cli/run.py) runs the same plan on one machine.

Never imports torch: the operator image stays small.
"""
