__version__ = "0.1.0"
# Bumped when a hook, a protocol or the checkpoint format changes incompatibly for plugins.
PLUGIN_API_VERSION = 2  # 2: samplers as plan/init_state/step (version-1 samplers still run through an adapter)
