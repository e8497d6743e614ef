"""The application layer: the ``ertacache`` command line (:mod:`.cli`, with the pipeline commands in
:mod:`.pipeline_cli`), its typed settings (:mod:`.settings`) and the demo (:mod:`.demo`)."""
