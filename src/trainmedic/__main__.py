from trainmedic.cli import main

main()
