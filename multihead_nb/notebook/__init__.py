"""The notebook surface: the `%%head`, `%%team` and `%mh` magics (`magics/`) and the widgets (`widgets/`), views
of the workspace's frames and pool. Calls the workspace and teams through their public API; never touches tensors."""
