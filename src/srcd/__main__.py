from vmmigrate.srcd.main import main

main()
