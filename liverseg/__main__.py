from liverseg.cli import main

main()
