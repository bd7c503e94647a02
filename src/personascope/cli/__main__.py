from personascope.cli import main

main()
