"""bbam: Bounding Box Attribution Maps, from box annotations to pixel masks at dataset scale."""

__version__ = "0.1.0"
