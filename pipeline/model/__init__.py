"""The model side: ``adapter`` (any supported VLM), ``hooks`` (interventions), ``scoring``
(answer log-probabilities), ``evaluation`` (task utilities), ``default_model`` (the embedded VLM)."""
