"""The live operator process: the kopf registrations that watch LLMRuns and their children
(`handlers.py`), the LLMRun reconcile loop and the API calls that carry out each decision
(`controller.py`), and the work queue both reconcile loops share (`workqueue.py`).
"""
