"""The `mobilemoe` command line (installed as `mobilemoe.cli`): export, run, chat, inspect, demo.

Every command is thin: it parses its options, calls the library function with the same
keyword arguments, and prints. Errors the user can fix (`mobilemoe.MobileMoEError`) are one
`error: ...` line on stderr and exit code 1.
"""
