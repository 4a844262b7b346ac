"""Asynchronous parameter-server training on CPU over torch.distributed.rpc (`distrec ps`)."""
