"""The NTP-vs-MTP study (`mtp-study`): a grid of runs on the same data and token budget,
measured for next-token loss, throughput, simulated and real drafting, effective speedup."""
