"""placeholder replaced below"""
from memorag_core.memory.base import Memory


class BeaconMemory(Memory):
    kind = "beacon"
