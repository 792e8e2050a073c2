"""Review in a browser: a trame-slicer page over the scene Logic, for result folders on a server.

May import the core, detection, exports and mrml (the Logic it is a thin layer over) and the web packages
``trame*``; it does not import ``slicer`` or ``vtk`` itself (every scene operation is the mrml wing's).
Nothing but cli imports it.
"""
