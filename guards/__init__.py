"""Guards: input/output classifiers, policies and the Azure-style content-filter results."""
