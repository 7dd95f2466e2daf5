import sys

try:
    from star_export.cli import main
except KeyboardInterrupt:  # Ctrl-C while Python imports the package: one line, as main() does
    sys.stderr.write("star_export: interrupted\n")
    sys.exit(130)

sys.exit(main())
