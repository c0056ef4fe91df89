"""The guide during training: the guide cache, its embedding job's unit of work, and where a step's
guide rows come from."""
