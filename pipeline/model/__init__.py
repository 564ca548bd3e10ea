"""The model side: ``adapter`` (any supported VLM), ``hooks`` (interventions), ``scoring``
(answer log-probabilities), ``evaluation`` (task utilities), ``default`` (the embedded VLM)."""
