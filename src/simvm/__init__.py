"""simvm: a pure-Python QEMU stand-in, controlled over QMP, that migrates its memory.

The daemons drive simvm and real ``qemu-system-x86_64`` with one QMP driver; simvm speaks
the subset of QMP that driver uses, plus a few ``x-simvm-*`` commands for tests.

Modules, by who runs what:

- ``main``: the QEMU-like command line and process lifetime;
- ``monitor``: the QMP server (greeting, negotiation, dispatch, events);
- ``emulator``: what each command does, with QEMU's error messages;
- ``machine``: guest memory, the vCPU thread, the dirty log, the run-state machine;
- ``migration``: the status machine, parameters, capabilities and the precopy policy;
- ``outgoing``: the source side of a migration; ``incoming``: the destination side;
- ``stream``: the wire format (documented there).

Errors::

    CommandError          a QMP error reply (class + desc), raised by command handlers
    StreamError           the destination rejects the stream -> NAK, exit status 1
    MigrationError        the source's migration failed -> query-migrate "failed"
    TransitionError       a run-state change the table forbids (a simvm bug)
"""
