"""Ray Tune sweeps of any training stage: a sweep's spec and checks (`sweep`), one trial
(`trial`), the Ray Tune adapter (`tuner`) and running a whole sweep (`driver`).
"""
