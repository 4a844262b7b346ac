"""The DLRM model: MLPs, interactions, the embedding part behind one interface."""
