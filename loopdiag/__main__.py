from loopdiag.cli import main

main()
