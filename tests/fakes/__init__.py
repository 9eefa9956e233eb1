"""Honest fakes of external interfaces (NVML), answering as the real ones do."""
