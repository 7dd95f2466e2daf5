"""The commands of ``python -m star_export``, one module each; :mod:`star_export.cli` assembles them.

Every command module has the same face, read by :func:`star_export.cli.build_parser`:

- ``NAME``: the command (``python -m star_export NAME``);
- ``HELP``: its line in the top-level command list;
- ``DESCRIPTION`` and ``EPILOG`` (examples, or None): its ``--help`` text; with an epilog both are
  printed as written (``RawDescriptionHelpFormatter``), without one the description is wrapped;
- ``add_arguments(parser)``: its flags, declared here or reused from the stage that reads them
  (:func:`star_export.engines.add_build_arguments`, :func:`star_export.bench.add_bench_arguments`,
  :func:`star_export.deploy.add_triton_arguments`, :mod:`star_export.flags`);
- ``run(args) -> int``: the exit code; a user mistake raises :class:`~star_export.errors.UsageError`
  (exit 2, one line), a missing TensorRT or GPU :class:`~star_export.errors.MissingComponent` (exit 3).

Imports run one way: cli -> commands -> the Python API (api, session, evaluate, deploy, engines,
bench) -> stages. The heavy ones are imported inside ``run``, so that ``--help`` stays quick.
"""
