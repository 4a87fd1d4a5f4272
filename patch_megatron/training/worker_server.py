"""Imported only by the fork server of the data-loader workers (its preload, see
``data.start_worker_server``), never by the run itself.

The server then dies with the run, and each worker it forks dies with the server, even when
the run is SIGKILLed (``parent_death``). Without this a killed run's workers would wait
forever: torch's workers watch only their parent (the server), and the server exits only
once every process holding its "alive" pipe, the workers included, has.
"""

from patch_megatron import parent_death

parent_death.die_with_parent()
parent_death.install()
