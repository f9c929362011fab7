"""The model side: engine interface, the local Mllama engine, scheduler, demo model."""
