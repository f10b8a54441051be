//! Fetching and caching of models and data (filled in by the assets work).
