from vmmigrate.dstd.main import main

main()
