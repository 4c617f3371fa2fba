"""Old home of :class:`trtlm.mapping.Mapping`; kept as a re-export until every importer has moved."""
from trtlm.mapping import Mapping  # noqa: F401
