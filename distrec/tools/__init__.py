"""The commands around the trainer: ``distrec plan``, ``bench``, ``ps`` (the async parameter-server
baseline), ``reshard``, ``doctor``, and the data tools (``data synth``, ``data preprocess``)."""
