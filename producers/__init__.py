"""Producers: the GPU and system collectors, the job SDK, the publisher and the fleet simulator."""
