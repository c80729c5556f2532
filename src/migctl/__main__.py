from vmmigrate.migctl.main import main

main()
