"""Zoo constants the command line needs at import time, in a module that imports nothing.

``bench.cli`` builds its options when it is imported; reading the download cap from :mod:`bench.zoo.fetch`
would load the fetcher (and the manifest schema) on every ``bench`` command.
"""

DEFAULT_MAX_SIZE = 2 * 1024**3  # 2 GiB: the largest CIFAR WideResNets are a few hundred MB
