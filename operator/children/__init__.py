"""The objects the operator creates for a run, each a pure function of the spec: the stage jobs
(a PyTorchJob, `pytorchjob.py`, or a Trainer v2 TrainJob, `trainjob.py`, behind one interface in
`launchers.py`), the RayService that serves the chat model (`rayservice.py`), the run's
NetworkPolicies (`network.py`), the Job that deletes its files (`cleanup.py`), the security context
of every pod (`security.py`), and how a job queued through Kueue is read and suspended (`kueue.py`).
"""
