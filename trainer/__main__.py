from moesaic.trainer.main import main

main()
