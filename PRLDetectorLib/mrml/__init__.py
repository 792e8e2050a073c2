"""MRML: the Slicer scene side: volume nodes and segments ↔ the core, the scene logic, the detection child process.

The only wing that imports ``slicer``, ``vtk`` or MRML (never ``qt``); may import every wing but cli.
"""
