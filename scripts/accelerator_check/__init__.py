"""The engine of ``scripts/check_accelerator.py``: its parts (``parts``) and its report
(``report``), beside the script that runs them and outside the ``fjt`` package."""
